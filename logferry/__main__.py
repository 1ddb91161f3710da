from logferry.cli import main

main()
