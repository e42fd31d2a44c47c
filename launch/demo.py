"""Old name of ``python -m demo`` (the shapes demo moved to the demo package); kept so that old commands run."""
if __name__ == "__main__":
    import sys

    from demo.shapes import main

    sys.exit(main())
