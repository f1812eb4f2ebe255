"""Studies, top-down: `definitions` (the shipped studies' specs) and `cli` (their command
lines) -> `runner` (a Ray Tune study logged to MLflow) -> `driver` (each trial fits a Ray Train
`TorchTrainer`); `spec`, `resources` and `state` hold what a study is, how its trials fit the
cluster and what a resumed driver reads back. Importing this package imports none of them."""
