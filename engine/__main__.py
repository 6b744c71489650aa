"""`python -m engine ...` (also what torchrun launches): the same CLI as the `engine` script."""

from cli.main import main

if __name__ == "__main__":
    main()
