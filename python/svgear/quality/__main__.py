"""svgear-quality: `python3 -m svgear.quality {train,evaluate,capture} [options]`."""
import sys

USAGE = "usage: python3 -m svgear.quality {train,evaluate,capture} [options]  (each takes --help)"


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command == "train":
        from .train import main as run
    elif command in ("evaluate", "eval"):
        from .evaluate import main as run
    elif command == "capture":
        from .capture import main as run
    else:
        print("svgear-quality: unknown command %r\n%s" % (command, USAGE), file=sys.stderr)
        return 2
    return run(rest)


if __name__ == "__main__":
    sys.exit(main())
