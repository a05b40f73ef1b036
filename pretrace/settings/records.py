"""Which columns of a record file hold each field: the flags every command that reads records shares.

Torch-free (unlike `pretrace.data`, which re-exports these names), so `pretrace COMMAND --help` builds its flags
without loading torch."""

from __future__ import annotations

from dataclasses import dataclass

from pretrace.config import option
from pretrace.errors import PretraceError

CANONICAL_FIELDS = ("text", "prompt", "completion", "id")


@dataclass(frozen=True)
class Fields:
    """Which column holds each canonical field (--text-field, --prompt-field, --completion-field, --id-field). `id`
    None: the 'id' column where a record has one, else the record's position; a column named must be in every record."""

    text: str = "text"
    prompt: str = "prompt"
    completion: str = "completion"
    id: str | None = None

    def column(self, key: str) -> str:
        """How a message names the column of canonical field `key`: its name, and the flag that chose it when not the default."""
        name = getattr(self, key) or key
        return f"'{name}'" if name == key else f"'{name}' (--{key}-field)"

    def canonical(self, obj: dict, where: str) -> dict:
        """The record with its columns renamed to the canonical names; other columns kept (e.g. evidence_ids)."""
        if self.id is not None and self.id not in obj:
            raise PretraceError(f"{where}: has no column {self.id!r}, which --id-field names (found: {sorted(obj)}); "
                                "name the column that holds the ids, or drop --id-field to number records by position.")
        if self == DEFAULT_FIELDS:
            return obj
        columns = {getattr(self, name) or name for name in CANONICAL_FIELDS}
        out = {k: v for k, v in obj.items() if k not in CANONICAL_FIELDS and k not in columns}
        for name in CANONICAL_FIELDS:
            column = getattr(self, name) or name
            if column in obj:
                out[name] = obj[column]
        return out


DEFAULT_FIELDS = Fields()


@dataclass
class FieldOptions:
    """The column-name flags of every command that reads records (a base of its settings dataclass)."""

    text_field: str = option("text", help="Column holding a document's text (or a query's whole text).")
    prompt_field: str = option("prompt", help="Column holding a query's or fine-tuning example's prompt.")
    completion_field: str = option("completion", help="Column holding the completion whose loss is measured.")
    id_field: str | None = option(None, help="Column holding a record's id, which every record must then have (default: the 'id' column where there is one, else the record's 0-based position).")

    def fields(self) -> Fields:
        columns = {"--text-field": self.text_field, "--prompt-field": self.prompt_field, "--completion-field": self.completion_field,
                   "--id-field": self.id_field}
        for flag, column in columns.items():
            if column is not None and not column.strip():
                raise PretraceError(f"{flag} {column!r} names no column; pass the column's name, or drop {flag} for the default.")
            shared = [other for other, value in columns.items() if other != flag and value == column and column is not None]
            if shared:
                raise PretraceError(f"{flag} and {shared[0]} both name the column {column!r}; each field needs its own column.")
        return Fields(self.text_field, self.prompt_field, self.completion_field, self.id_field)


FIELD_FLAGS = ("--text-field", "--prompt-field", "--completion-field", "--id-field")  # read by every command that reads records
