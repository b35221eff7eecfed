"""The official pretrained files of the paper profile: what they are, fetching, verifying.

registry.yaml  each file: what uses it, its params key, the URL and hashes its project publishes
registry.py    `Weight` entries and the lock file of hashes recorded on first verified download
download.py    the only network code: one resumable HTTP download
store.py       fetch (download, verify, unpack, rename into place) and what is there now
command.py     `visual-echoes weights list|fetch|check`
"""
