#include "CBoringAEAD.h"
