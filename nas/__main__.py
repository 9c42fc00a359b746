"""``python -m nas`` runs the ``unet-nas`` command line."""

from nas.cli import main

if __name__ == "__main__":
    main()
