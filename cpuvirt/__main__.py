try:
    from cpuvirt.cli import main
except KeyboardInterrupt:  # Ctrl-C while the modules load: nothing has begun, so nothing to undo
    import sys

    print("cpuvirt: interrupted", file=sys.stderr)
    raise SystemExit(130) from None

raise SystemExit(main())
