"""The run directory: what a run leaves on disk and how it is written so that nothing is lost. All-or-nothing
writes (`atomic`), checkpoints and their trainer state as safetensors + JSON (`checkpoint`, `state_file`),
sharded checkpoints of several processes (`sharded`), a stage's final models (`final`), the metrics log
(`metrics`), the NaN guard that keeps the last good checkpoint (`guard`), one run per folder (`run_lock`),
and `export` of a finished policy.

It stands on `engine.parallel` only (sharded writes are collectives) and takes models as objects with
`save_pretrained` and state dicts, so trainers and stages above it use it and it imports none of them."""
