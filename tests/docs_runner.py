"""Runs documentation code blocks in one process, each in a fresh namespace and folder.

    python tests/docs_runner.py blocks.json results.json [seconds per block, default 120]

``blocks.json`` is a list of ``{"id": ..., "source": ...}`` (a prelude and the block, as one
script); ``results.json`` gets ``{id: "ok" | traceback}``. One process for all the blocks that
run without a launcher saves an interpreter start and the imports per block (tests/test_docs.py).
"""
from __future__ import annotations

import json
import os
import signal
import sys
import time
import traceback
from pathlib import Path
from typing import Any

BLOCK_TIMEOUT_S = int(sys.argv[3]) if len(sys.argv) > 3 else 120


def _alarm(signum: int, frame: Any) -> None:
    raise TimeoutError(f"the block ran longer than {BLOCK_TIMEOUT_S} s")


def main() -> None:
    blocks = json.loads(Path(sys.argv[1]).read_text())
    out = Path(sys.argv[2])
    base = out.parent / "blocks"
    results: dict[str, str] = {}
    signal.signal(signal.SIGALRM, _alarm)
    import horovod_iter.backend as hb

    for k, block in enumerate(blocks):
        folder = base / f"{k:03d}"
        folder.mkdir(parents=True)
        os.chdir(folder)
        signal.alarm(BLOCK_TIMEOUT_S)
        t0 = time.perf_counter()
        try:
            code = compile(block["source"], f"<{block['id']}>", "exec")
            exec(code, {"__name__": "__main__"})
            results[block["id"]] = "ok"
        except BaseException:  # every failure, SystemExit too, is the block's result
            results[block["id"]] = traceback.format_exc()
        finally:
            signal.alarm(0)
            hb.shutdown()
            print(f"{block['id']}: {time.perf_counter() - t0:.1f} s", flush=True)
        out.write_text(json.dumps(results))  # what ran so far survives a crash


if __name__ == "__main__":
    main()
