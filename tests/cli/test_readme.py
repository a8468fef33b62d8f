"""CI must run exactly the README's test command."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    block = readme.split("<!-- test-command -->", 1)[1]
    command = re.search(r"```bash\n(.*?)\n```", block, re.S).group(1).strip()
    # the venv creation differs (CI makes its own fresh venv); the install + test part must be identical
    install_and_test = command.split("&& ", 2)[2]
    assert install_and_test in (ROOT / ".ci" / "run").read_text()
