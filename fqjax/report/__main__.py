"""python -m fqjax.report WORKDIR: writes report.md, report.html and figures/ (see fqjax.report)."""
import sys

from fqjax.report import main

sys.exit(main())
