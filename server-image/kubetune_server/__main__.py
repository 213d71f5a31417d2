"""``python -m kubetune_server``: serve the model described by the environment (see app.py)."""

from kubetune_server.app import main

if __name__ == "__main__":
    raise SystemExit(main())
