from vaeft.cli import main

main()
