from promptline.devtools.drills.runner import main

raise SystemExit(main())
