"""Developer tooling: the local stack, the demo, the camera simulator, the operator client, benchmarks,
the soak, reports and dashboards. Nothing that runs on a line imports this package; the `inspection` CLI
(workers/cli.py) reaches it only inside the subcommands that need it."""
