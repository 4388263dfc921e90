"""`python -m lit_flash ...`, or run as a plain script: `python src/lit_flash/__main__.py fit --config ...`
(what a FlexAI training job does after installing requirements.txt)."""

import sys
from pathlib import Path

if not __package__:  # a plain script: make `import lit_flash` find this source tree
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lit_flash import interrupt  # noqa: E402

try:  # importing the CLI loads torch and Lightning: seconds in which a Ctrl-C can land
    from lit_flash.cli import main
except KeyboardInterrupt:
    raise interrupt.stopped_while_starting() from None

if __name__ == "__main__":
    main()
