"""`python -m vlatune ...` (and `accelerate launch -m vlatune train ...`) run the CLI."""

from vlatune.cli import main

if __name__ == "__main__":
    main()
