"""`make bench`: run every benchmark script in bench/ in turn; each prints its own table (ratios measured in the
same run; machines are noisy, so compare numbers only within one run)."""
import glob
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))


def main() -> int:
    scripts = sorted(p for p in glob.glob(os.path.join(HERE, "*.py")) if not os.path.basename(p).startswith("_"))
    only = sys.argv[1:]
    failed = []
    for path in scripts:
        name = os.path.splitext(os.path.basename(path))[0]
        if only and name not in only:
            continue
        print(f"\n=== bench/{name}.py", flush=True)
        t0 = time.time()
        rc = subprocess.run([sys.executable, "-m", f"bench.{name}"], cwd=os.path.dirname(HERE)).returncode
        print(f"=== bench/{name}.py: exit {rc}, {time.time() - t0:.0f} s", flush=True)
        if rc:
            failed.append(name)
    if failed:
        print("failed: " + ", ".join(failed))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
