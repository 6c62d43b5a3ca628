"""``python -m scatter._node``: run a node in the foreground (what auto-start launches)."""

from __future__ import annotations

import argparse
import sys

from .._config import (
    DEFAULT_CALL_TIMEOUT,
    NodeConfig,
    membership_profile,
    normalize_address,
    resolve_node_config,
)
from .._exceptions import ConfigError
from ._server import run_node


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m scatter._node")
    parser.add_argument("--address", default=None)
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--call-timeout", type=float, default=DEFAULT_CALL_TIMEOUT)
    parser.add_argument("--max-workers", type=int, default=NodeConfig.max_workers)
    parser.add_argument("--secret-file", default=None)
    parser.add_argument("--join", action="append", default=[], metavar="ADDR")
    parser.add_argument("--profile", choices=("lan", "local"), default="lan")
    args = parser.parse_args(argv)
    try:
        config = resolve_node_config(
            args.address,
            args.data_dir,
            secret_file=args.secret_file,
            call_timeout=args.call_timeout,
            max_workers=args.max_workers,
            join=tuple(normalize_address(a) for a in args.join),
            membership=membership_profile(args.profile),
        )
        run_node(config)
    except ConfigError as exc:
        print(f"scatter node: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
