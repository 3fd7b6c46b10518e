"""A loopback HTTP file server with byte ranges (206 answers), for benchmarks that read data remotely.

    python -m benchmarks.range_server FOLDER   # prints "port N" once it listens on 127.0.0.1

Run as its own process so that its CPU time is not counted with the reader's. Standard library only.
"""

from __future__ import annotations

import argparse
import functools
import http.server
import os
import re


class RangeHandler(http.server.SimpleHTTPRequestHandler):
    """Files of the served folder, whole (200) or one ``Range: bytes=a-b`` at a time (206), and folder listings;
    quiet."""

    def log_message(self, *args):
        pass

    def do_HEAD(self):
        self._serve(body=False)

    def do_GET(self):
        self._serve(body=True)

    def _serve(self, body: bool) -> None:
        path = self.translate_path(self.path)
        if os.path.isdir(path):  # the folder's listing (fsspec lists a folder URL through it)
            return super().do_GET() if body else super().do_HEAD()
        if not os.path.isfile(path):
            self.send_error(404)
            return
        size = os.path.getsize(path)
        start, end, status = 0, size - 1, 200
        m = re.match(r"bytes=(\d+)-(\d*)$", self.headers.get("Range", ""))
        if m:
            start, end, status = int(m.group(1)), min(int(m.group(2) or size - 1), size - 1), 206
        self.send_response(status)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("Content-Length", str(end - start + 1))
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
        self.end_headers()
        if body:
            with open(path, "rb") as f:
                f.seek(start)
                self.wfile.write(self.payload(start, f.read(end - start + 1)))

    def payload(self, start: int, data: bytes) -> bytes:
        """The bytes sent for a response starting at offset ``start`` of the file (a subclass may cut them)."""
        return data


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("folder", help="the folder to serve")
    a = p.parse_args(argv)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0),
                                             functools.partial(RangeHandler, directory=os.path.abspath(a.folder)))
    print(f"port {server.server_address[1]}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
