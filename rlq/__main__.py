"""`python -m rlq ...` (and `torchrun -m rlq learner ...`) runs the same CLI as the `rlq` script."""

from rlq.cli import main

if __name__ == "__main__":
    main()
