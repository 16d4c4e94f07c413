"""beear-pipeline file for ensuring the package is executable
as `beear-pipeline` and `python -m beear_pipeline` (`kedro run`'s options), and
`python -m beear_pipeline reaudit --workers N` for the re-audit fanned out over registry versions
(pipelines/reaudit/fanout.py).
"""
import sys
from pathlib import Path
from typing import Any

from kedro.framework.cli.utils import find_run_command
from kedro.framework.project import configure_project


def main(*args, **kwargs) -> Any:
    package_name = Path(__file__).parent.name
    configure_project(package_name)

    interactive = hasattr(sys, 'ps1')
    kwargs["standalone_mode"] = not interactive

    run = find_run_command(package_name)
    return run(*args, **kwargs)


if __name__ == "__main__":
    if sys.argv[1:2] == ["reaudit"]:
        from beear_pipeline.pipelines.reaudit.fanout import main as reaudit_fanout

        sys.exit(reaudit_fanout(sys.argv[2:]))
    main()
