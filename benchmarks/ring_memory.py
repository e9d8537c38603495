"""Context-parallel attention memory per rank: `python -m tritformer.bench.ring` (same options;
`python -m tritformer bench --op ring` gives the same measurement as bench rows)."""
import sys

from tritformer.bench.ring import main

if __name__ == "__main__":
    sys.exit(main())
