"""The engine: what a checkpoint holds, how and when it is written, resume.

- `checkpoint_manager`: `CheckpointManager`, the engine object both faces
  drive (the `Checkpoint` callback for `fit`, or a custom loop directly).
- `policies`: when to save (`SaveEveryNSteps`, ...) and what to keep
  (`KeepLast`, ...), combined with `|`.
- `state`: what a checkpoint holds (`TrainingState`, snapshots, the `state=`
  adapters, `DataPosition`).
- `resume`: which checkpoint a run continues from, and its one restore path.
- `commit`: the save protocol (`Committer`: write, commit, retain, mirror).
- `writer`: the background thread that runs a save (`BackgroundWriter`).
"""
