"""opdlm command line: python run.py [conf=FILE ...] [key=value ...] [--check | --list | --help]."""

from opdlm.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
