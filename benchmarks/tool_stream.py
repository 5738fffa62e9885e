"""What streaming a tool call as it is generated costs the event loop: ToolStream's time per chunk.

    flock /tmp/bench.lock .venv/bin/python benchmarks/tool_stream.py [--items N] [--chars-per-chunk K]

A hermes-format call whose arguments list N objects is fed to ToolStream K characters per chunk (about
a token's worth), as the server's chat stream feeds it; it prints the text's length, the chunks, and the
mean and worst time per chunk (partial_json reads only the new text, so the time per chunk should not
grow with the text already sent).
"""

from __future__ import annotations

import argparse
import json
import time

from meshserve.server.tool_stream import ToolStream
from meshserve.server.tools import plan_tools


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--items", type=int, default=40)
    parser.add_argument("--chars-per-chunk", type=int, default=3)
    args = parser.parse_args()
    items = [{"id": i, "name": f"item {i}", "tags": ["a", "b"], "price": i * 1.5} for i in range(args.items)]
    text = "<tool_call>\n" + json.dumps({"name": "f", "arguments": {"items": items}}) + "\n</tool_call>"
    stream = ToolStream(plan_tools([{"type": "function", "function": {"name": "f"}}], "auto", True, "hermes"))
    step = args.chars_per_chunk
    pieces = [text[i : i + step] for i in range(0, len(text), step)]
    times = []
    for i, piece in enumerate(pieces):
        finish = "stop" if i == len(pieces) - 1 else None
        start = time.perf_counter()
        stream.chunk({"choices": [{"index": 0, "delta": {"content": piece}, "finish_reason": finish}]})
        times.append(time.perf_counter() - start)
    print(
        f"{len(text)} characters in {len(pieces)} chunks: {sum(times) / len(times) * 1e6:.0f} us per chunk "
        f"(mean), worst {max(times[:-1]) * 1e6:.0f} us; the last (the whole parse) {times[-1] * 1e6:.0f} us"
    )


if __name__ == "__main__":
    main()
