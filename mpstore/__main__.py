"""``python -m mpstore`` is the ``agl`` command."""

from .cli import main

if __name__ == "__main__":
    main()
