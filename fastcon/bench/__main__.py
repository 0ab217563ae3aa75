from fastcon.bench import main

raise SystemExit(main())
