import sys

from stc_npu_agent.cli import main

sys.exit(main())
