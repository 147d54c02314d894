"""What a person sees: pictures (render), the page's payload and maths (hover, web/), words (text), exports."""
