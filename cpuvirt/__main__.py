from cpuvirt.cli import main

raise SystemExit(main())
