from loop.cli import main

main()
