from mtf_core.cli import main

raise SystemExit(main())
