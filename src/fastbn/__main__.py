"""``python -m fastbn``: the environment report (see :mod:`fastbn._report`)."""
from ._report import main

main()
