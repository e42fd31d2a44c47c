"""Old name of ``python -m demo.evaluate`` (moved to the demo package); kept so that old commands run."""
if __name__ == "__main__":
    from demo.evaluate import main

    raise SystemExit(main())
