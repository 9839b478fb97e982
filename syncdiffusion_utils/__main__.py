"""`python -m syncdiffusion_utils ...` runs the `syncdiffusion` command."""

import sys

from syncdiffusion_utils.cli import main


if __name__ == "__main__":
    sys.exit(main())
