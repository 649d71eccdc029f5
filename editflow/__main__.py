from editflow.engine.cli import main

raise SystemExit(main())
