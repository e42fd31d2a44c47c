"""``python -m demo [shapes] [options]``: the whole pipeline on the synthetic shapes set (`make demo`);
``python -m demo emoji [options]``: the same stages on a folder of captioned images, Noto Color Emoji by default
(docs/emoji.md)."""
import sys

if __name__ == "__main__":
    args = sys.argv[1:]
    if args[:1] == ["emoji"]:
        from demo.emoji import main

        sys.exit(main(args[1:]))
    from demo.shapes import main

    sys.exit(main(args[1:] if args[:1] == ["shapes"] else args))
