import os
import sys

# MLflow's INFO lines (database set-up, run links) would break into the progress
# view; Ray's processes inherit this too.
os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")

from orchestrator.cli import main  # noqa: E402

sys.exit(main())
