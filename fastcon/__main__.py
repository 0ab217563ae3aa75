"""``python -m fastcon info``: the backends of this machine as a short table; anything else is
``fastcon-bench`` (``python -m fastcon --help``)."""
import sys

if sys.argv[1:2] == ["info"]:
    from fastcon import backend_info

    print(backend_info(pretty=True))
    raise SystemExit(0)

from fastcon.bench import main  # noqa: E402

raise SystemExit(main())
