"""Stream a chat reply from PromptService with the typed Python client.

Start the suite with `make run`, then:

    .venv/bin/python examples/grpc_client.py "Tell me about Promptline"

Options: --target (default 127.0.0.1:50051), --api-key (default dev-key), --model (default sim),
--max-tokens, --timeout (seconds).
"""

from __future__ import annotations

import argparse
import asyncio
import sys

from promptline.client import Finished, PromptlineClient, PromptlineError, Started, TextDelta


async def main(args: argparse.Namespace) -> int:
    async with PromptlineClient(args.target, args.api_key, timeout=args.timeout) as client:
        try:
            async for event in client.stream_chat(
                args.model, [{"role": "user", "content": args.message}],
                max_tokens=args.max_tokens,
            ):
                match event:
                    case Started(request_id=rid, model=model):
                        print(f"[{model}, request {rid}]", file=sys.stderr)
                    case TextDelta(text=text):
                        print(text, end="", flush=True)
                    case Finished(finish_reason=reason, usage=usage):
                        print(f"\n[{reason}: {usage.prompt_tokens} prompt + "
                              f"{usage.completion_tokens} completion tokens]", file=sys.stderr)
        except PromptlineError as err:
            hint = f", retry in {err.retry_after_ms} ms" if err.retry_after_ms else ""
            print(f"\nerror {err.code} at {err.stage}: {err.message} "
                  f"(retryable={err.retryable}{hint}, request {err.request_id})", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("message", nargs="?", default="Hello!")
    parser.add_argument("--target", default="127.0.0.1:50051")
    parser.add_argument("--api-key", default="dev-key")
    parser.add_argument("--model", default="sim")
    parser.add_argument("--max-tokens", type=int, default=None)
    parser.add_argument("--timeout", type=float, default=60.0)
    sys.exit(asyncio.run(main(parser.parse_args())))
