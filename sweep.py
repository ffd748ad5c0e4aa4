"""opdlm sweeps: python sweep.py [--name N] [--seeds 0,1,2] [--jobs J] OVERLAY.yaml ... [key=value ...]"""

from opdlm.sweep import main

if __name__ == "__main__":
    raise SystemExit(main())
