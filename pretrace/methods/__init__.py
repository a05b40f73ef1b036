"""Attribution methods behind one interface: `fit` pays the one-off cost, `score` the per-query cost.

`base` holds the interface (`Attributor`, `ScoringContext`), `config` each method's own settings (torch-free, so
`pretrace score --help` lists them without loading torch), `gradient` the preconditioned-gradient methods. The
registry that builds any method from its config sits above the baselines, in `pretrace.workflows.registry`."""
