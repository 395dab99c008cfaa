from asl_tune.cli import main

raise SystemExit(main())
