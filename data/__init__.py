"""Data preparation for lrc: token files (prepare.py, with chat.py for conversations), the training windows
(loader.py) and the offline toy world (toy.py).

A package so that `from data.prepare import prepare, open_tokens` and `from data.toy import build_toy`
work from the repository root. Kept empty: importing `data` must stay cheap.
"""
