"""The data path: raw files to examples.

From the bottom up: `sources.py` (what a data key names: one source or a weighted mixture; the
row digests of a held-out split), `files.py` (files, globs, folders, compressed shards, Hub
datasets through `datasets`; column checks; `map_splits`), `streaming.py` (the iterable
pipeline with a resumable position), `mixture.py` (weighted sources, map-style and streamed),
`raw.py` (the raw splits a task starts from), `builtin.py` (the offline tokenizer and tiny
model configs behind the embedded defaults). A module imports only the ones before it.

May import: `notrainer.errors`, `notrainer.compat`. Never imports the engine, a task or the CLI.
"""
