"""The offline model kit: tiny (or real-size, random) SD v1 component folders built without a download.
`python -m sd.kit --help`."""
