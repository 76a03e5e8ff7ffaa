from deltafit.cli import main

main()
