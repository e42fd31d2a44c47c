"""``python -m demo [shapes] [options]``: the whole pipeline on the synthetic shapes set (`make demo`)."""
import sys

from demo.shapes import main

if __name__ == "__main__":
    args = sys.argv[1:]
    sys.exit(main(args[1:] if args[:1] == ["shapes"] else args))
