from zimage_serve.cli import main

main()
