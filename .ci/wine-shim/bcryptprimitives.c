/*
 * Wine 8 lacks bcryptprimitives.dll, from which Rust's std on Windows imports
 * ProcessPrng; every test binary would die at start-up. This stand-in fills
 * the buffer from RtlGenRandom (advapi32!SystemFunction036), which Wine has.
 * Used only to run the Windows test binaries under Wine in CI.
 */
#include <windows.h>

BOOLEAN WINAPI SystemFunction036(PVOID buffer, ULONG length);

BOOL WINAPI ProcessPrng(PBYTE buf, SIZE_T len)
{
    while (len > 0) {
        ULONG n = len > 0x40000000 ? 0x40000000 : (ULONG)len;
        if (!SystemFunction036(buf, n))
            return FALSE;
        buf += n;
        len -= n;
    }
    return TRUE;
}
