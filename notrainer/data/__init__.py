"""The data path: raw files to examples.

`files.py` (files, globs, folders, compressed shards, Hub datasets through `datasets`;
`map_splits`), `streaming.py` (the iterable pipeline with a resumable position), `builtin.py`
(the offline tokenizer and tiny model configs behind the embedded defaults).

May import: `notrainer.errors`, `notrainer.compat`. Never imports the engine, a task or the CLI.
"""
